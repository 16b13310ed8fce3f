{#-
  Freshness (api.md): when the materialization builds S, it records the build time in the
  package's `audsync_syncs.evaluated_at`, in the same transaction as the new S.

  Why here and not elsewhere: neither DuckDB nor PostgreSQL keeps a table's creation time,
  and dbt's run_results.json lives on the machine that ran dbt, is overwritten by every dbt
  command and is absent when another tool (an orchestrator elsewhere) runs dbt. The state
  table is in the warehouse, beside S, where every runner, scheduler and CLI reads it.

  The time is dbt's UTC clock, as the runner's own timestamps are. Nothing is recorded while
  the state table is not built yet (the first `dbt build` may build S before it): the runner
  then treats the freshness as unknown and runs.
-#}
{% macro record_evaluation(sync_name) %}
  {%- set node = graph.nodes.get('model.audsync.audsync_syncs') -%}
  {%- if node is none -%}{{ return(none) }}{%- endif -%}
  {%- set state = adapter.get_relation(database=node.database, schema=node.schema, identifier=node.alias or node.name) -%}
  {%- if state is none -%}{{ return(none) }}{%- endif -%}
  {%- set columns = adapter.get_columns_in_relation(state) | map(attribute='name') | map('lower') | list -%}
  {%- if 'evaluated_at' not in columns -%}{{ return(none) }}{%- endif -%}
  {%- set built = "cast('" ~ modules.datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M:%S.%f') ~ "' as " ~ dbt.type_timestamp() ~ ")" -%}
  {%- set name = dbt.string_literal(sync_name | replace("'", "''")) -%}
  {% do adapter.dispatch('write_evaluation', 'audsync')(state, columns, name, built) %}
{% endmacro %}

{% macro default__write_evaluation(state, columns, name, built) %}
  {% call statement('audsync_evaluated_at') -%}
    update {{ state }} set evaluated_at = {{ built }} where sync_name = {{ name }}
  {%- endcall %}
  {% call statement('audsync_evaluated_at_new') -%}
    insert into {{ state }} (sync_name, status, evaluated_at, updated_at)
    select {{ name }}, 'active', {{ built }}, {{ built }}
    where not exists (select 1 from {{ state }} where sync_name = {{ name }})
  {%- endcall %}
{% endmacro %}

{#- Spark's Parquet tables take no UPDATE: the state table is rewritten with the sync's row
    changed, or added (macros/spark/rewrite.sql). -#}
{% macro spark__write_evaluation(state, columns, name, built) %}
  {%- set set_new = {'sync_name': name, 'status': "'active'", 'evaluated_at': built, 'updated_at': built} -%}
  {%- set kept, added = [], [] -%}
  {%- for column in columns -%}
    {%- set quoted = adapter.quote(column) -%}
    {%- do kept.append(("case when sync_name = " ~ name ~ " then " ~ built ~ " else evaluated_at end" if column == 'evaluated_at' else quoted) ~ " as " ~ quoted) -%}
    {%- do added.append(set_new.get(column, 'null') ~ " as " ~ quoted) -%}
  {%- endfor -%}
  {%- set new_content -%}
select {{ kept | join(', ') }} from {{ state }}
union all
select {{ added | join(', ') }}
where not exists (select 1 from {{ state }} where sync_name = {{ name }})
  {%- endset -%}
  {% do audsync.rewrite_table(state, new_content) %}
{% endmacro %}
