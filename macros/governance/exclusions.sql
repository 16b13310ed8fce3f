{#-
  Exclusions (suppression lists, governance.md). A member whose key is in any list of the
  sync's `exclude` or the project's `audsync_exclude` is left out of S, listed in
  S__excluded with the list that excluded it, and, when the snapshot holds it, removed in
  every mode (S__changes of add and upsert syncs carries the removal too; mirror and remove
  syncs remove it already, since it is not in S). Keys match as a marketer expects: ignoring
  case and surrounding spaces.
-#}

{#- The form in which a key matches an exclusion list. -#}
{% macro exclusion_match_key(expression) -%}
lower(trim(cast({{ expression }} as {{ dbt.type_string() }})))
{%- endmacro %}

{#- Every excluded key of the sync, matched form, with the list's name. -#}
{% macro exclusion_keys_sql(sync) %}
  {%- for item in sync.governance.exclude %}
select {{ audsync.exclusion_match_key(adapter.quote(item.column)) }} as audsync_excluded_key,
       cast({{ dbt.string_literal(item.model) }} as {{ dbt.type_string() }}) as audsync_exclusion_list
from {{ item.relation }}
where {{ adapter.quote(item.column) }} is not null
{%- if not loop.last %}
union all
{%- endif %}
  {%- endfor %}
{%- endmacro %}

{#- S's select with the excluded members and, for a split, the other groups left out.
    The materialization's hook: S = governed_membership_sql(membership_sql(...)). -#}
{% macro governed_membership_sql(membership_sql, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set governed = audsync.apply_exclusions(membership_sql, sync) -%}
  {%- if sync.governance.split is not none -%}
    {%- set governed = audsync.split_filter_sql(governed, sync) -%}
  {%- endif -%}
  {{ return(governed) }}
{% endmacro %}

{#- `membership_sql` without the members an exclusion list holds. -#}
{% macro apply_exclusions(membership_sql, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- if not sync.governance.exclude -%}{{ return(membership_sql) }}{%- endif -%}
  {%- set result -%}
select audsync_member.*
from ({{ membership_sql }}) as audsync_member
where not exists (
    select 1 from ({{ audsync.exclusion_keys_sql(sync) }}) as audsync_excluded
    where audsync_excluded.audsync_excluded_key = {{ audsync.exclusion_match_key('audsync_member.' ~ n.key) }}
)
  {%- endset -%}
  {{ return(result) }}
{% endmacro %}

{#- S__excluded: the members left out by an exclusion list, with the list. -#}
{% macro excluded_sql(membership_sql, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
    audsync_member.{{ n.key }},
    cast('excluded' as {{ dbt.type_string() }}) as {{ n.reason }},
    audsync_excluded.audsync_exclusion_list as _audsync_exclusion_list
from ({{ membership_sql }}) as audsync_member
inner join ({{ audsync.exclusion_keys_sql(sync) }}) as audsync_excluded
    on audsync_excluded.audsync_excluded_key = {{ audsync.exclusion_match_key('audsync_member.' ~ n.key) }}
{%- endmacro %}

{#- The removals of excluded members the snapshot holds, in S__changes' columns. Only add
    and upsert syncs need them: in mirror and remove modes an excluded member, being out
    of S, is a removal already. -#}
{% macro excluded_removals_sql(snapshot, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
    cast('remove' as {{ dbt.type_string() }}) as {{ n.op }},
    snapshot.{{ n.key }}
    {%- for column in sync.columns %},
    snapshot.{{ adapter.quote(column) }}
    {%- endfor %},
    snapshot.{{ n.hash }},
    snapshot.{{ n.destination_id }}
from {{ snapshot }} as snapshot
where exists (
    select 1 from ({{ audsync.exclusion_keys_sql(sync) }}) as audsync_excluded
    where audsync_excluded.audsync_excluded_key = {{ audsync.exclusion_match_key('snapshot.' ~ n.key) }}
)
{%- endmacro %}

{#- S__changes' select with the removals of excluded members (the materialization's hook). -#}
{% macro with_excluded_removals(changes_sql, snapshot, sync) %}
  {%- if not sync.governance.exclude or sync.mode not in ['add', 'upsert'] -%}{{ return(changes_sql) }}{%- endif -%}
  {%- set result -%}
{{ changes_sql }}
union all
{{ audsync.excluded_removals_sql(snapshot, sync) }}
  {%- endset -%}
  {{ return(result) }}
{% endmacro %}
