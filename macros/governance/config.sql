{#-
  Validation of the governance config keys of a sync (governance.md): `split_group`,
  `exclude` (and the project's `audsync_exclude` var), and the guardrails `max_removals_pct`,
  `guard_min_rows`, `max_removals`, `max_changes_pct`, `allow_empty`. Called once from
  `sync_config`; every error names the sync, the key, the value and what was expected.

  Returns {'split': none or {'name', 'group', 'salt', 'groups', 'range'}, 'exclude': [
  {'model', 'column', 'relation'}], 'guardrails': {...}}.
-#}

{% macro governance_config(where, identifier) %}
  {%- set result = {'split': none, 'exclude': [], 'guardrails': {}} -%}

  {#- split_group: 'split.group', both declared in vars.audsync_splits -#}
  {%- set split_group = config.get('split_group') -%}
  {%- if split_group is not none -%}
    {%- if split_group is not string or (split_group.split('.') | length) != 2 -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key 'split_group' is " ~ split_group ~ "; expected '<split>.<group>' naming a split of vars.audsync_splits, e.g. split_group='hv_q4.treatment'") }}
    {%- endif -%}
    {%- set split_name, group_name = split_group.split('.') -%}
    {%- set split = audsync.split_definition(split_name, where ~ ": config key 'split_group' is '" ~ split_group ~ "'") -%}
    {%- set found = [] -%}
    {%- for group in split.groups -%}
      {%- if group.name == group_name -%}{%- do found.append(group) -%}{%- endif -%}
    {%- endfor -%}
    {%- if not found -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key 'split_group' is '" ~ split_group ~ "': split '" ~ split_name ~ "' has no group '" ~ group_name ~ "'; expected one of " ~ split.groups | map(attribute='name') | join(', ')) }}
    {%- endif -%}
    {%- do result.update({'split': {'name': split_name, 'group': group_name, 'salt': split.salt,
                                    'groups': split.groups, 'range': found[0].range}}) -%}
  {%- endif -%}

  {#- exclude: this sync's lists, then the project's -#}
  {%- set lists = [] -%}
  {%- set sync_lists = config.get('exclude', []) -%}
  {%- set project_lists = var('audsync_exclude', []) -%}
  {%- for key, value in [('exclude', sync_lists), ('vars.audsync_exclude', project_lists)] -%}
    {%- if value is none -%}{%- set value = [] -%}{%- endif -%}
    {%- if value is string -%}{%- set value = [value] -%}{%- endif -%}
    {%- if value is mapping or value is not sequence -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ key ~ "' is " ~ value ~ "; expected a list of model names or {'model': ..., 'column': ...}, e.g. exclude=['do_not_contact']") }}
    {%- endif -%}
    {%- for item in value -%}
      {%- set position = key ~ "[" ~ loop.index0 ~ "]" -%}
      {%- if item is string -%}
        {%- set item = {'model': item} -%}
      {%- endif -%}
      {%- if item is not mapping or 'model' not in item or (item.keys() | reject('in', ['model', 'column']) | list) -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ "' is " ~ item ~ "; expected a model name or {'model': ..., 'column': ...}") }}
      {%- endif -%}
      {%- set column = item.get('column') or identifier -%}
      {%- if item.model is not string or item.model | trim == '' or column is not string -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ "' is " ~ item ~ "; expected the model name and column as strings") }}
      {%- endif -%}
      {%- set relation = audsync.exclusion_relation(item.model, where ~ ": config key '" ~ position ~ "' is '" ~ item.model ~ "'") -%}
      {%- set names_seen = lists | map(attribute='model') | list -%}
      {%- if item.model not in names_seen -%}
        {%- do lists.append({'model': item.model, 'column': column, 'relation': relation}) -%}
      {%- endif -%}
    {%- endfor -%}
  {%- endfor -%}
  {%- do result.update({'exclude': lists}) -%}

  {#- guardrails: sync config over the project's vars.audsync_guardrails -#}
  {%- set defaults = var('audsync_guardrails', {}) -%}
  {%- if defaults is not mapping -%}
    {{ exceptions.raise_compiler_error(where ~ ": vars.audsync_guardrails is " ~ defaults ~ "; expected a mapping such as {max_removals_pct: 50}") }}
  {%- endif -%}
  {%- set guardrails = {} -%}
  {%- for key, kind, fallback in [('max_removals_pct', 'percent', 50), ('guard_min_rows', 'count', 100),
                                  ('max_removals', 'count', none), ('max_changes_pct', 'percent', none),
                                  ('allow_empty', 'boolean', false)] -%}
    {%- set value = config.get(key, defaults.get(key, fallback)) -%}
    {%- if value is not none -%}
      {%- if kind == 'boolean' and value is not boolean -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ key ~ "' is " ~ value ~ "; expected true or false") }}
      {%- elif kind != 'boolean' and (value is boolean or value is not number or value < 0) -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ key ~ "' is " ~ value ~ "; expected a number of " ~ ('percent, 0 to 100' if kind == 'percent' else 'rows, 0 or more')) }}
      {%- elif kind == 'percent' and value > 100 -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ key ~ "' is " ~ value ~ "; expected a percent from 0 to 100") }}
      {%- elif kind == 'count' and value != (value | int) -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ key ~ "' is " ~ value ~ "; expected a whole number of rows") }}
      {%- endif -%}
    {%- endif -%}
    {%- do guardrails.update({key: value}) -%}
  {%- endfor -%}
  {%- do result.update({'guardrails': guardrails}) -%}
  {{ return(result) }}
{% endmacro %}


{#- The split `split_name` of vars.audsync_splits, validated, with each group's bucket range
    [lo, hi) in basis points. Every problem fails naming the split; `context` says who asked. -#}
{% macro split_definition(split_name, context) %}
  {%- set splits = var('audsync_splits', {}) -%}
  {%- if splits is not mapping -%}
    {{ exceptions.raise_compiler_error(context ~ ": vars.audsync_splits is " ~ splits ~ "; expected a mapping of split names to {salt, groups}") }}
  {%- endif -%}
  {%- if split_name not in splits -%}
    {{ exceptions.raise_compiler_error(context ~ ": split '" ~ split_name ~ "' is not declared in vars.audsync_splits; splits: " ~ (splits.keys() | list | sort | join(', ') or 'none')) }}
  {%- endif -%}
  {%- set raw = splits[split_name] -%}
  {%- set here = "audsync: split '" ~ split_name ~ "' (vars.audsync_splits." ~ split_name ~ ")" -%}
  {%- if raw is not mapping -%}
    {{ exceptions.raise_compiler_error(here ~ " is " ~ raw ~ "; expected {salt: ..., groups: [{name: ..., percent: ...}, ...]}") }}
  {%- endif -%}
  {%- if raw.get('salt') is none or raw.get('salt') is not string or raw.get('salt') | trim == '' -%}
    {{ exceptions.raise_compiler_error(here ~ ": key 'salt' is " ~ (raw.get('salt') | string if raw.get('salt') is not none else 'missing') ~ "; expected a non-empty string, e.g. salt: 'hv-2026-q4'") }}
  {%- endif -%}
  {%- set groups = raw.get('groups') -%}
  {%- if groups is none or groups is string or groups is mapping or groups is not sequence or (groups | length) == 0 -%}
    {{ exceptions.raise_compiler_error(here ~ ": key 'groups' is " ~ (groups | string if groups is not none else 'missing') ~ "; expected a list of {name: ..., percent: ...}") }}
  {%- endif -%}
  {%- set out = [] -%}
  {%- set state = {'lo': 0, 'names': []} -%}
  {%- for group in groups -%}
    {%- set position = "groups[" ~ loop.index0 ~ "]" -%}
    {%- if group is not mapping or group.get('name') is not string or group.get('percent') is none or group.get('percent') is boolean or group.get('percent') is not number -%}
      {{ exceptions.raise_compiler_error(here ~ ": key '" ~ position ~ "' is " ~ group ~ "; expected {name: <text>, percent: <number>}") }}
    {%- endif -%}
    {%- if group.name in state.names or '.' in group.name -%}
      {{ exceptions.raise_compiler_error(here ~ ": key '" ~ position ~ ".name' is '" ~ group.name ~ "'; expected a name without dots, used once in the split") }}
    {%- endif -%}
    {%- set width = (group.percent * 100) | round | int -%}
    {%- if group.percent < 0 or width != group.percent * 100 -%}
      {{ exceptions.raise_compiler_error(here ~ ": key '" ~ position ~ ".percent' is " ~ group.percent ~ "; expected a percent of 0 or more with at most two decimals") }}
    {%- endif -%}
    {%- do out.append({'name': group.name, 'percent': group.percent, 'range': [state.lo, state.lo + width]}) -%}
    {%- do state.names.append(group.name) -%}
    {%- do state.update({'lo': state.lo + width}) -%}
  {%- endfor -%}
  {%- if state.lo != 10000 -%}
    {{ exceptions.raise_compiler_error(here ~ ": the groups' percents sum to " ~ (state.lo / 100) ~ "; expected 100") }}
  {%- endif -%}
  {{ return({'name': split_name, 'salt': raw.salt, 'groups': out}) }}
{% endmacro %}


{#- The relation of the exclusion list `name` (a model, seed or snapshot of the project). -#}
{% macro exclusion_relation(name, context) %}
  {%- set found = [] -%}
  {%- for node in graph.nodes.values() -%}
    {%- if node.resource_type in ['model', 'seed', 'snapshot'] and node.name == name -%}
      {%- do found.append(node) -%}
    {%- endif -%}
  {%- endfor -%}
  {%- if not found -%}
    {{ exceptions.raise_compiler_error(context ~ ", which is no model, seed or snapshot of this project; expected the name of a list of keys to exclude") }}
  {%- endif -%}
  {%- set node = found[0] -%}
  {{ return(api.Relation.create(database=node.database, schema=node.schema, identifier=(node.alias or node.name))) }}
{% endmacro %}
