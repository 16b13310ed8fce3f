{#- BigQuery: md5 returns BYTES (to_hex makes the hex text, as dbt.hash does), a hex text
    casts to INT64 with a 0x prefix, and GoogleSQL has mod() but no % operator. -#}
{% macro bigquery__split_bucket(key_expr, salt) -%}
mod(cast(concat('0x', substr({{ dbt.hash(dbt.concat([dbt.string_literal(salt ~ ':'), key_expr])) }}, 1, 8)) as int64), 10000)
{%- endmacro %}
