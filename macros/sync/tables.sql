{#-
  Tables a sync keeps across runs: the snapshot and the plan. They hold the only record of
  what the destination has, so `dbt run` creates them when missing, adds the columns a new
  mapping needs, and never drops, replaces or truncates them, --full-refresh included.
-#}

{#- Create `relation` from the empty `shape_sql` when missing, else add its missing columns.
    Returns the relation. -#}
{% macro ensure_table(relation, shape_sql) %}
  {#- Where tables are rewritten whole (Spark), finish or undo a rewrite a kill interrupted. -#}
  {% do audsync.recover_rewrite(relation) %}
  {%- set existing = adapter.get_relation(database=relation.database, schema=relation.schema, identifier=relation.identifier) -%}
  {%- if existing is none -%}
    {% call statement('audsync_create_' ~ relation.identifier) -%}
      {{ get_create_table_as_sql(False, relation, shape_sql) }}
    {%- endcall %}
    {% do audsync.create_sync_indexes(relation) %}
  {%- elif existing.type != 'table' -%}
    {{ exceptions.raise_compiler_error("audsync: " ~ existing ~ " is a " ~ existing.type ~ "; audsync keeps its state there and expects a table. Drop or rename it, then run again.") }}
  {%- else -%}
    {%- set wanted = get_column_schema_from_query(shape_sql) -%}
    {%- set have = adapter.get_columns_in_relation(existing) | map(attribute='name') | map('lower') | list -%}
    {%- set missing = [] -%}
    {%- for column in wanted -%}
      {%- if column.name | lower not in have -%}{%- do missing.append(column) -%}{%- endif -%}
    {%- endfor -%}
    {%- if missing -%}
      {% do log("audsync: adding column(s) " ~ missing | map(attribute='name') | join(', ') ~ " to " ~ existing, info=True) %}
      {% do alter_relation_add_remove_columns(existing, missing, none) %}
    {%- endif -%}
  {%- endif -%}
  {{ return(relation) }}
{% endmacro %}


{#- Indexes on the snapshot and plan, where an engine gains from them. -#}
{% macro create_sync_indexes(relation) %}
  {{ return(adapter.dispatch('create_sync_indexes', 'audsync')(relation)) }}
{% endmacro %}

{#- Most warehouses (DuckDB, Snowflake, BigQuery) have no secondary indexes worth keeping. -#}
{% macro default__create_sync_indexes(relation) %}
{% endmacro %}

{#- PostgreSQL: the runner reads a plan by (run id, seq) ranges and commits by key; without
    these it would scan the whole table for every batch. The candidate keys are only ever
    hashed whole, so they go without. -#}
{% macro postgres__create_sync_indexes(relation) %}
  {%- set n = audsync.audsync_names() -%}
  {%- if relation.identifier.endswith(n.suffixes.candidates) -%}{{ return('') }}{%- endif -%}
  {%- set index_name = adapter.quote(relation.identifier ~ '_audsync_idx') -%}
  {% call statement('audsync_index_' ~ relation.identifier) -%}
    {%- if relation.identifier.endswith(n.suffixes.plan) %}
    create index if not exists {{ index_name }} on {{ relation }} ({{ n.run_id }}, {{ n.seq }})
    {%- else %}
    create unique index if not exists {{ index_name }} on {{ relation }} ({{ n.key }})
    {%- endif %}
  {%- endcall %}
{% endmacro %}


{#- Replace the view `relation` with `select_sql`. -#}
{% macro replace_view(relation, select_sql) %}
  {%- set existing = adapter.get_relation(database=relation.database, schema=relation.schema, identifier=relation.identifier) -%}
  {%- if existing is not none -%}
    {{ adapter.drop_relation(existing) }}
  {%- endif -%}
  {% call statement('audsync_view_' ~ relation.identifier) -%}
    {{ get_create_view_as_sql(relation, select_sql) }}
  {%- endcall %}
{% endmacro %}


{#- Refresh the planner's statistics of `relation` where the engine keeps them. -#}
{% macro refresh_statistics(relation) %}
  {{ return(adapter.dispatch('refresh_statistics', 'audsync')(relation)) }}
{% endmacro %}

{% macro default__refresh_statistics(relation) %}
{% endmacro %}

{#- PostgreSQL plans the diff views' joins from these: stale counts for the candidate keys
    can turn a hash join into a nested loop over the whole audience. -#}
{% macro postgres__refresh_statistics(relation) %}
  {% call statement('audsync_analyze_' ~ relation.identifier) -%}
    analyze {{ relation }}
  {%- endcall %}
{% endmacro %}
