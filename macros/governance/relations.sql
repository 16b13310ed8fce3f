{#-
  The governance relations of a sync S, built by the materialization beside its own:

    S__excluded  view   members left out by an exclusion list, with the list (when `exclude`)
    S__split     view   every member with its split, group and bucket (when `split_group`)
    S__history   table  every change the destination accepted; created when missing, never
                        replaced; rows older than vars.audsync_history_days are deleted

  The suffixes are spelled in macros/_names.sql (`governance_suffixes`), beside the others.
-#}

{#- The materialization's hook: build the governance relations of `target_relation`. -#}
{% macro governance_relations(target_relation, select_sql, sync) %}
  {%- set made = [] -%}
  {%- set sibling = {} -%}
  {%- for part, suffix in audsync.audsync_names().governance_suffixes.items() -%}
    {%- do sibling.update({part: api.Relation.create(
          database=target_relation.database, schema=target_relation.schema,
          identifier=target_relation.identifier ~ suffix,
          type=('table' if part == 'history' else 'view'))}) -%}
  {%- endfor -%}
  {%- set membership = audsync.membership_sql(select_sql, sync) -%}
  {#- A view of a feature the sync no longer uses would go stale: drop it. -#}
  {%- if sync.governance.exclude -%}
    {% do audsync.replace_view(sibling.excluded, audsync.excluded_sql(membership, sync)) %}
    {%- do made.append(sibling.excluded) -%}
  {%- else -%}
    {% do adapter.drop_relation(sibling.excluded) %}
  {%- endif -%}
  {%- if sync.governance.split is not none -%}
    {% do audsync.replace_view(sibling.split, audsync.split_view_sql(audsync.apply_exclusions(membership, sync), sync)) %}
    {%- do made.append(sibling.split) -%}
  {%- else -%}
    {% do adapter.drop_relation(sibling.split) %}
  {%- endif -%}
  {% do audsync.ensure_history_table(sibling.history) %}
  {% do audsync.apply_history_retention(sibling.history) %}
  {%- do made.append(sibling.history) -%}
  {{ return(made) }}
{% endmacro %}

{#- Create S__history when missing; never replace it. (Not `ensure_table`: that gives a
    table a unique index on the key, and history holds many rows per key.) -#}
{% macro ensure_history_table(relation) %}
  {% do audsync.recover_rewrite(relation) %}
  {%- set existing = adapter.get_relation(database=relation.database, schema=relation.schema, identifier=relation.identifier) -%}
  {%- if existing is none -%}
    {% call statement('audsync_create_' ~ relation.identifier) -%}
      {{ get_create_table_as_sql(False, relation, audsync.history_shape_sql()) }}
    {%- endcall %}
    {% do adapter.dispatch('create_history_index', 'audsync')(relation) %}
  {%- elif existing.type != 'table' -%}
    {{ exceptions.raise_compiler_error("audsync: " ~ existing ~ " is a " ~ existing.type ~ "; audsync keeps the sync's membership history there and expects a table. Drop or rename it, then run again.") }}
  {%- endif -%}
{% endmacro %}

{% macro default__create_history_index(relation) %}
{% endmacro %}

{#- PostgreSQL: `audsync history S --key K` and the holdout log read one key's rows. -#}
{% macro postgres__create_history_index(relation) %}
  {% call statement('audsync_index_' ~ relation.identifier) -%}
    create index if not exists {{ adapter.quote(relation.identifier ~ '_audsync_key_idx') }}
    on {{ relation }} (_audsync_key, _audsync_committed_at)
  {%- endcall %}
{% endmacro %}

{#- The typed, empty shape of S__history (empty_table: a select with a FROM, since BigQuery
    takes no WHERE in a select without one). -#}
{% macro history_shape_sql() %}
  {%- set n = audsync.audsync_names() -%}
  {{ return(audsync.empty_table([
      (n.key, 'string'),
      (n.op, 'string'),
      (n.hash, 'string'),
      (n.run_id, 'string'),
      ('_audsync_committed_at', 'timestamp'),
      ('_audsync_split_group', 'string'),
  ])) }}
{%- endmacro %}

{#- Retention: with vars.audsync_history_days = N, rows committed more than N days ago go. -#}
{% macro apply_history_retention(relation) %}
  {%- set days = var('audsync_history_days', none) -%}
  {%- if days is none -%}{{ return('') }}{%- endif -%}
  {%- if days is boolean or days is not number or days < 0 -%}
    {{ exceptions.raise_compiler_error("audsync: vars.audsync_history_days is " ~ days ~ "; expected a number of days (leave it unset to keep all history)") }}
  {%- endif -%}
  {%- set cutoff = dbt.dateadd('day', -1 * (days | int), dbt.current_timestamp()) -%}
  {% do adapter.dispatch('delete_history_before', 'audsync')(relation, cutoff) %}
{% endmacro %}

{% macro default__delete_history_before(relation, cutoff) %}
  {% call statement('audsync_history_retention_' ~ relation.identifier) -%}
    delete from {{ relation }}
    where _audsync_committed_at < {{ cutoff }}
  {%- endcall %}
{% endmacro %}

{#- Spark's Parquet tables take no DELETE: the history is rewritten without the old rows. -#}
{% macro spark__delete_history_before(relation, cutoff) %}
  {% do audsync.rewrite_table(relation, "select * from " ~ relation ~ " where not coalesce(_audsync_committed_at < " ~ cutoff ~ ", false)") %}
{% endmacro %}
