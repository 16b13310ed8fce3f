{#- BigQuery refuses the default's `select ... where not exists (...)` without FROM: one
    MERGE updates the sync's row or inserts it (see sync/evaluation.sql). -#}
{% macro bigquery__write_evaluation(state, columns, name, built) %}
  {% call statement('audsync_evaluated_at') -%}
    merge into {{ state }} as audsync_state
    using (select {{ name }} as sync_name) as audsync_new
    on audsync_state.sync_name = audsync_new.sync_name
    when matched then update set evaluated_at = {{ built }}
    when not matched then insert (sync_name, status, evaluated_at, updated_at)
      values (audsync_new.sync_name, 'active', {{ built }}, {{ built }})
  {%- endcall %}
{% endmacro %}
