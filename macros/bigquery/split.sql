{#- BigQuery: md5 returns BYTES (to_hex makes the hex text, as dbt.hash does), a hex text
    casts to INT64 with a 0x prefix, and GoogleSQL has mod() but no % operator. -#}
{% macro bigquery__split_bucket(key_expr, salt) -%}
mod(cast(concat('0x', {{ audsync._split_hex_prefix(key_expr, salt) }}) as int64), 10000)
{%- endmacro %}
