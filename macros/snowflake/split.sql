{#- Snowflake casts no 0x-prefixed text to a number: to_number reads hex by its format
    (32 bits fit NUMBER(38, 0)). -#}
{% macro snowflake__split_bucket(key_expr, salt) -%}
(to_number(upper({{ audsync._split_hex_prefix(key_expr, salt) }}), 'XXXXXXXX') % 10000)
{%- endmacro %}
