{#-
  Changing a table where the engine has no UPDATE or DELETE: Spark's own Parquet tables (no
  Delta Lake here: only the package registries are reachable, and delta-spark fetches its
  jars from elsewhere at run time). A table T that must change is rewritten whole:

    1. `T__audsync_next` is created from the select of T's new content (CREATE TABLE AS
       SELECT: the metastore lists the table only once its data is written);
    2. T is renamed `T__audsync_old`;
    3. `T__audsync_next` is renamed T;
    4. `T__audsync_old` is dropped.

  Each step is one metastore operation. A kill between two steps leaves a state that
  `recover_rewrite` (run before every read or write of T by the package and the runner)
  finishes or undoes: T missing with both others present means step 3 did not happen, and the
  complete new content is in `T__audsync_next` (roll forward); T present means any
  `T__audsync_next` is an abandoned write (dropped: T keeps its old content) and any
  `T__audsync_old` is the old content after the swap (dropped). So T holds the old content or
  the new one, never a mix. The same protocol in Python: python/audsync/warehouse/spark.py.
-#}

{#- Put `relation` back after a rewrite that was killed midway (see above). No-op where the
    engine changes tables in place. -#}
{% macro recover_rewrite(relation) %}
  {{ return(adapter.dispatch('recover_rewrite', 'audsync')(relation)) }}
{% endmacro %}

{% macro default__recover_rewrite(relation) %}
{% endmacro %}

{% macro spark__recover_rewrite(relation) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set found = {} -%}
  {%- for part, suffix in [('main', ''), ('next', n.rewrite_suffixes.next), ('old', n.rewrite_suffixes.old)] -%}
    {%- set existing = adapter.get_relation(database=relation.database, schema=relation.schema, identifier=relation.identifier ~ suffix) -%}
    {#- dbt-spark may list a table without its type; only tables are ever rewritten. -#}
    {%- do found.update({part: none if existing is none else audsync.table_named(relation, suffix)}) -%}
  {%- endfor -%}
  {%- if found.main is none and found.next is not none and found.old is not none -%}
    {% do log("audsync: finishing an interrupted rewrite of " ~ relation, info=True) %}
    {{ adapter.rename_relation(found.next, relation) }}
    {%- do found.update({'main': relation, 'next': none}) -%}
  {%- elif found.main is none and found.old is not none -%}
    {{ adapter.rename_relation(found.old, relation) }}
    {%- do found.update({'main': relation, 'old': none}) -%}
  {%- endif -%}
  {%- for part in ['next', 'old'] -%}
    {%- if found[part] is not none -%}{% do adapter.drop_relation(found[part]) %}{%- endif -%}
  {%- endfor -%}
  {#- dbt keeps one Spark session per thread, which caches the file listing of each table it
      read: another session's rewrite or append since (the runner's commit) would make the
      next read fail or miss rows. -#}
  {%- if found.main is not none -%}
    {% do run_query('refresh table ' ~ audsync.table_named(relation, '')) %}
  {%- endif -%}
{% endmacro %}

{#- The table `relation.identifier ~ suffix` beside `relation`. -#}
{% macro table_named(relation, suffix) %}
  {{ return(api.Relation.create(database=relation.database, schema=relation.schema, identifier=relation.identifier ~ suffix, type='table')) }}
{% endmacro %}

{#- Replace the content of the table `relation` with `select_sql` (which may read it). -#}
{% macro rewrite_table(relation, select_sql) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set relation = audsync.table_named(relation, '') -%}
  {%- set next = audsync.table_named(relation, n.rewrite_suffixes.next) -%}
  {%- set old = audsync.table_named(relation, n.rewrite_suffixes.old) -%}
  {% do audsync.recover_rewrite(relation) %}
  {% call statement('audsync_rewrite_' ~ relation.identifier) -%}
    {{ get_create_table_as_sql(False, next, select_sql) }}
  {%- endcall %}
  {{ adapter.rename_relation(relation, old) }}
  {{ adapter.rename_relation(next, relation) }}
  {% do adapter.drop_relation(old) %}
{% endmacro %}

{#- Recover every state table of the package (an on-run-start hook: before dbt looks for
    them). Renders no SQL. -#}
{% macro recover_state_tables() %}
  {%- if execute -%}
    {%- for node in graph.nodes.values() -%}
      {%- if node.resource_type == 'model' and node.package_name == 'audsync' and 'audsync_state' in node.tags -%}
        {% do audsync.recover_rewrite(api.Relation.create(database=node.database, schema=node.schema, identifier=node.alias or node.name, type='table')) %}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{ return('') }}
{% endmacro %}
