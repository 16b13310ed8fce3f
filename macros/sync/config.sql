{#-
  Validation of a sync model's config (contract section 2). Every error names the sync,
  the key, the value and what was expected, so the fix is obvious from the message.
-#}

{% macro sync_config(source_columns) %}
  {%- set names = audsync.audsync_names() -%}
  {%- set where = "audsync: sync '" ~ model.name ~ "' (" ~ model.original_file_path ~ ")" -%}

  {#- A misspelt key would otherwise be ignored silently: catch the likely ones. -#}
  {%- set known = ['destination', 'sync_mode', 'identifier', 'identifier_normalise', 'field_mapping', 'schedule', 'config'] -%}
  {%- for key in model.config.keys() -%}
    {%- if key not in known -%}
      {%- for prefix in ['sync', 'dest', 'ident', 'field', 'mapping', 'schedul'] -%}
        {%- if key.startswith(prefix) -%}
          {{ exceptions.raise_compiler_error(where ~ ": unknown config key '" ~ key ~ "'; the keys of an audience_sync model are " ~ known | join(', ')) }}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
  {%- endfor -%}

  {#- destination -#}
  {%- set destination = config.get('destination') -%}
  {%- if destination is none or destination is not string or destination | trim == '' -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'destination' is " ~ (destination | string if destination is not none else 'missing') ~ "; expected the name of a destination in destinations.yml, e.g. destination='crm_hook'") }}
  {%- endif -%}

  {#- sync_mode -#}
  {%- set raw_mode = config.get('sync_mode', 'mirror') -%}
  {%- set mode = names.mode_aliases.get(raw_mode, raw_mode) if raw_mode is string else raw_mode -%}
  {%- if mode not in names.modes -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'sync_mode' is '" ~ raw_mode ~ "'; expected one of " ~ names.modes | join(', ') ~ " (aliases: additive = add, subtractive = remove)") }}
  {%- endif -%}

  {#- identifier -#}
  {%- set identifier = config.get('identifier') -%}
  {%- if identifier is none or identifier is not string or identifier | trim == '' -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'identifier' is " ~ (identifier | string if identifier is not none else 'missing') ~ "; expected the name of the entity key column of the select, one of: " ~ source_columns | join(', ')) }}
  {%- endif -%}
  {%- set identifier_column = audsync._find_column(identifier, source_columns) -%}
  {%- if identifier_column is none -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'identifier' is '" ~ identifier ~ "', which the select does not return; expected one of: " ~ source_columns | join(', ')) }}
  {%- endif -%}

  {#- identifier_normalise: how the destination matches keys (see normalised_key) -#}
  {%- set normalise = config.get('identifier_normalise', 'none') -%}
  {%- if normalise is none -%}{%- set normalise = 'none' -%}{%- endif -%}
  {%- if normalise is not string or normalise not in audsync.identifier_normalisations() -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'identifier_normalise' is '" ~ normalise ~ "'; expected one of " ~ audsync.identifier_normalisations() | join(', ') ~ " (lower_trim for emails at Meta, Google, HubSpot, Mailchimp, Klaviyo)") }}
  {%- endif -%}

  {#- field_mapping -#}
  {%- set raw_mapping = config.get('field_mapping', []) -%}
  {%- if raw_mapping is none -%}{%- set raw_mapping = [] -%}{%- endif -%}
  {%- if raw_mapping is string or raw_mapping is mapping or raw_mapping is not sequence -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'field_mapping' is " ~ raw_mapping ~ "; expected a list of {'source_column': ..., 'destination_field': ...}") }}
  {%- endif -%}
  {%- set mapping = [] -%}
  {%- set destination_fields = [] -%}
  {%- for item in raw_mapping -%}
    {%- set position = "field_mapping[" ~ loop.index0 ~ "]" -%}
    {%- if item is not mapping or (item.keys() | list | sort) != ['destination_field', 'source_column'] -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ "' is " ~ item ~ "; expected exactly the keys source_column and destination_field, e.g. {'source_column': 'email', 'destination_field': 'email'}") }}
    {%- endif -%}
    {%- for part in ['source_column', 'destination_field'] -%}
      {%- if item[part] is not string or item[part] | trim == '' -%}
        {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ "." ~ part ~ "' is " ~ item[part] ~ "; expected a non-empty string") }}
      {%- endif -%}
    {%- endfor -%}
    {%- set column = audsync._find_column(item['source_column'], source_columns) -%}
    {%- if column is none -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ ".source_column' is '" ~ item['source_column'] ~ "', which the select does not return; expected one of: " ~ source_columns | join(', ')) }}
    {%- endif -%}
    {%- if column.lower().startswith('_audsync_') -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ ".source_column' is '" ~ column ~ "'; names starting with _audsync_ are reserved for audsync's own columns, rename it in the select") }}
    {%- endif -%}
    {%- if item['destination_field'] in destination_fields -%}
      {{ exceptions.raise_compiler_error(where ~ ": config key '" ~ position ~ ".destination_field' is '" ~ item['destination_field'] ~ "', which an earlier entry already maps; expected each destination field once") }}
    {%- endif -%}
    {%- do destination_fields.append(item['destination_field']) -%}
    {%- do mapping.append({'source_column': column, 'destination_field': item['destination_field']}) -%}
  {%- endfor -%}

  {#- schedule: its form here; the runner checks cron fields in full with croniter -#}
  {%- set schedule = config.get('schedule', 'manual') -%}
  {%- set shortcuts = ['manual', '15m', 'hourly', 'daily', 'weekly'] -%}
  {%- if schedule is not string or (schedule not in shortcuts and (schedule.split() | length) != 5) -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'schedule' is '" ~ schedule ~ "'; expected one of " ~ shortcuts | join(', ') ~ " or a five-field cron expression such as '0 */4 * * *'") }}
  {%- endif -%}

  {#- config: destination-specific settings -#}
  {%- set settings = config.get('config', {}) -%}
  {%- if settings is none -%}{%- set settings = {} -%}{%- endif -%}
  {%- if settings is not mapping -%}
    {{ exceptions.raise_compiler_error(where ~ ": config key 'config' is " ~ settings ~ "; expected a mapping of destination settings, e.g. config={'list_id': '123'}") }}
  {%- endif -%}

  {#- The source columns S carries: each mapped column once, in mapping order. -#}
  {%- set columns = [] -%}
  {%- for item in mapping -%}
    {%- if item.source_column not in columns -%}{%- do columns.append(item.source_column) -%}{%- endif -%}
  {%- endfor -%}

  {{ return({
      'destination': destination,
      'mode': mode,
      'identifier': identifier_column,
      'identifier_normalise': normalise,
      'mapping': mapping,
      'columns': columns,
      'schedule': schedule,
      'settings': settings,
  }) }}
{% endmacro %}


{#- The select's own spelling of `name`: exact, else the one match ignoring case, else none. -#}
{% macro _find_column(name, columns) %}
  {%- if name in columns -%}{{ return(name) }}{%- endif -%}
  {%- set matches = [] -%}
  {%- for column in columns -%}
    {%- if column.lower() == name.lower() -%}{%- do matches.append(column) -%}{%- endif -%}
  {%- endfor -%}
  {{ return(matches[0] if matches | length == 1 else none) }}
{% endmacro %}


{#- The longest key a sync takes, in characters, the same on every warehouse. A longer key is
    an invalid row (identifier_too_long): PostgreSQL's btree index, which keeps the snapshot's
    keys unique, refuses entries over about 2.7 kB, and 512 characters are at most 2 kB in
    UTF-8. No email (254), phone or id comes near it. -#}
{% macro max_key_length() %}{{ return(512) }}{% endmacro %}


{#- The values of identifier_normalise: how the destination tells keys apart. `none`: as
    given; `trim`: surrounding spaces ignored; `lower_trim`: case and surrounding spaces
    ignored (emails at Meta, Google, HubSpot, Mailchimp, Klaviyo). Keys that are one key once
    normalised are duplicates: none of them is synced. -#}
{% macro identifier_normalisations() %}{{ return(['none', 'trim', 'lower_trim']) }}{% endmacro %}


{#- `expression` (a key) as the destination compares it, under `how`. -#}
{% macro normalised_key(expression, how) %}
  {%- if how == 'lower_trim' -%}lower(trim({{ expression }}))
  {%- elif how == 'trim' -%}trim({{ expression }})
  {%- else -%}{{ expression }}
  {%- endif -%}
{% endmacro %}
