{#-
  A typed, empty select: the whole definition of a table that other code fills (run
  history, row errors). `columns` is a list of (name, type) with types in dbt's portable
  names: string, bigint, float, integer, boolean, timestamp.
-#}
{% macro empty_table(columns) %}
select * from (
    select
    {%- for name, type in columns %}
        cast(null as {{ audsync.portable_type(type) }}) as {{ name }}{{ "," if not loop.last }}
    {%- endfor %}
) as audsync_empty
where 1 = 0
{%- endmacro %}

{% macro portable_type(type) %}
  {%- set types = {
      'string': dbt.type_string(),
      'bigint': dbt.type_bigint(),
      'float': dbt.type_float(),
      'integer': dbt.type_int(),
      'boolean': dbt.type_boolean(),
      'timestamp': dbt.type_timestamp(),
  } -%}
  {%- if type not in types -%}
    {{ exceptions.raise_compiler_error("audsync: unknown portable type '" ~ type ~ "'; expected one of " ~ types.keys() | join(', ')) }}
  {%- endif -%}
  {{- return(types[type]) -}}
{% endmacro %}
