{#- Snowflake casts no 0x-prefixed text to a number: to_number reads hex by its format
    (32 bits fit NUMBER(38, 0)). -#}
{% macro snowflake__split_bucket(key_expr, salt) -%}
(to_number(upper(substr({{ dbt.hash(dbt.concat([dbt.string_literal(salt ~ ':'), key_expr])) }}, 1, 8)), 'XXXXXXXX') % 10000)
{%- endmacro %}
