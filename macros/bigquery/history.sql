{#- BigQuery's dbt.dateadd gives a DATETIME, and a TIMESTAMP column does not compare with
    one: the cutoff is cast back to TIMESTAMP (UTC, as the history's times are). -#}
{% macro bigquery__delete_history_before(relation, cutoff) %}
  {% call statement('audsync_history_retention_' ~ relation.identifier) -%}
    delete from {{ relation }}
    where _audsync_committed_at < cast({{ cutoff }} as timestamp)
  {%- endcall %}
{% endmacro %}
