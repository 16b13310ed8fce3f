{#- Spark (ANSI mode, the default since Spark 4) and Databricks refuse to cast 0x-prefixed text
    to bigint: conv reads the hex digits in base 16 and writes them in base 10. Databricks
    dispatches here too (databricks__, spark__, default__). -#}
{% macro spark__split_bucket(key_expr, salt) -%}
(cast(conv({{ audsync._split_hex_prefix(key_expr, salt) }}, 16, 10) as bigint) % 10000)
{%- endmacro %}
