{#-
  The portability check's renderer (tests/portability/render.py): every relation the
  `audience_sync` materialization builds for the sync model this is called from, as the SQL
  statement the materialization would send, rendered by the current adapter's macros. The
  materialization itself introspects the warehouse (get_columns_in_query, get_relation), so
  this calls the package's SQL-producing macros in the same order and with the same
  relations as macros/materializations/audience_sync.sql, and the adapter's own DDL macros
  (get_create_table_as_sql, get_create_view_as_sql) around them. `source_columns` stands for
  what get_columns_in_query would return. Returns a JSON list of {relation, macro, sql}.
-#}
{% macro portability_statements(select_sql, source_columns) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set sync = audsync.sync_config(source_columns) -%}
  {%- set target_relation = this.incorporate(type='table') -%}
  {%- set intermediate_relation = make_intermediate_relation(target_relation) -%}
  {%- set sibling = {} -%}
  {%- for part, suffix in n.suffixes.items() -%}
    {%- do sibling.update({part: api.Relation.create(
          database=target_relation.database, schema=target_relation.schema,
          identifier=target_relation.identifier ~ suffix,
          type=('table' if part in ['snapshot', 'plan', 'candidates'] else 'view'))}) -%}
  {%- endfor -%}
  {%- set governance = {} -%}
  {%- for part, suffix in n.governance_suffixes.items() -%}
    {%- do governance.update({part: api.Relation.create(
          database=target_relation.database, schema=target_relation.schema,
          identifier=target_relation.identifier ~ suffix,
          type=('table' if part == 'history' else 'view'))}) -%}
  {%- endfor -%}
  {%- set out = [] -%}

  {#- S, built beside the old one (phase 3). -#}
  {%- set membership = audsync.membership_sql(select_sql, sync) -%}
  {%- do out.append({'relation': 'S', 'macro': 'governed_membership_sql(membership_sql) with row_hash, normalised_key' ~ (', apply_exclusions' if sync.governance.exclude else '') ~ (', split_filter_sql, split_bucket' if sync.governance.split else ''),
                     'sql': get_create_table_as_sql(False, intermediate_relation, audsync.governed_membership_sql(membership, sync))}) -%}

  {#- State kept across runs and the candidate keys (phase 4). -#}
  {%- do out.append({'relation': 'S__snapshot', 'macro': 'snapshot_shape_sql', 'sql': get_create_table_as_sql(False, sibling.snapshot, audsync.snapshot_shape_sql(target_relation, sync))}) -%}
  {%- do out.append({'relation': 'S__plan', 'macro': 'plan_shape_sql', 'sql': get_create_table_as_sql(False, sibling.plan, audsync.plan_shape_sql(target_relation, sync))}) -%}
  {%- do out.append({'relation': 'S__candidates', 'macro': 'candidates_shape_sql', 'sql': get_create_table_as_sql(False, sibling.candidates, audsync.candidates_shape_sql(target_relation))}) -%}
  {%- do out.append({'relation': 'S__candidates', 'macro': 'candidates_sql (the fill)', 'sql': 'insert into ' ~ sibling.candidates ~ ' (' ~ n.key ~ ')\n' ~ audsync.candidates_sql(target_relation, sibling.snapshot)}) -%}

  {#- The diff views among the candidate keys (phase 5). -#}
  {%- set audience = audsync.among_candidates(target_relation, sibling.candidates) -%}
  {%- set snapshot = audsync.among_candidates(sibling.snapshot, sibling.candidates) -%}
  {%- do out.append({'relation': 'S__adds', 'macro': 'adds_sql, among_candidates', 'sql': get_create_view_as_sql(sibling.adds, audsync.adds_sql(audience, snapshot, sync))}) -%}
  {%- do out.append({'relation': 'S__removes', 'macro': 'removes_sql, among_candidates', 'sql': get_create_view_as_sql(sibling.removes, audsync.removes_sql(audience, snapshot, sync))}) -%}
  {%- do out.append({'relation': 'S__updates', 'macro': 'updates_sql, among_candidates', 'sql': get_create_view_as_sql(sibling.updates, audsync.updates_sql(audience, snapshot, sync))}) -%}
  {%- do out.append({'relation': 'S__changes', 'macro': 'with_excluded_removals(changes_sql)', 'sql': get_create_view_as_sql(sibling.changes, audsync.with_excluded_removals(audsync.changes_sql(audience, snapshot, {'add': sibling.adds, 'remove': sibling.removes}, sync), snapshot, sync))}) -%}
  {%- do out.append({'relation': 'S__invalid', 'macro': 'invalid_sql', 'sql': get_create_view_as_sql(sibling.invalid, audsync.invalid_sql(select_sql, sync, source_columns))}) -%}

  {#- The governance relations (governance_relations). -#}
  {%- if sync.governance.exclude -%}
    {%- do out.append({'relation': 'S__excluded', 'macro': 'excluded_sql, exclusion_keys_sql', 'sql': get_create_view_as_sql(governance.excluded, audsync.excluded_sql(membership, sync))}) -%}
  {%- endif -%}
  {%- if sync.governance.split is not none -%}
    {%- do out.append({'relation': 'S__split', 'macro': 'split_view_sql, split_bucket', 'sql': get_create_view_as_sql(governance.split, audsync.split_view_sql(audsync.apply_exclusions(membership, sync), sync))}) -%}
  {%- endif -%}
  {%- do out.append({'relation': 'S__history', 'macro': 'history_shape_sql', 'sql': get_create_table_as_sql(False, governance.history, audsync.history_shape_sql())}) -%}

  {#- Statements the materialization runs on its tables rather than relations it creates,
      recorded by the check's statement() (capture_statements.sql) instead of run. -#}
  {%- do portability_recorded('-', '-') -%}
  {%- do audsync.apply_history_retention(governance.history) -%}
  {%- do out.extend(portability_recorded('S__history', 'apply_history_retention, delete_history_before')) -%}
  {%- set syncs = graph.nodes.get('model.audsync.audsync_syncs') -%}
  {%- set syncs_relation = api.Relation.create(database=syncs.database, schema=syncs.schema, identifier=syncs.alias or syncs.name, type='table') -%}
  {#- record_evaluation would read the table's columns from the warehouse: the model's own. -#}
  {%- set columns = modules.re.findall('\) as (\w+)', render(syncs.raw_code)) -%}
  {%- set built = "cast('2026-12-02 07:00:00.000000' as " ~ dbt.type_timestamp() ~ ")" -%}
  {%- do adapter.dispatch('write_evaluation', 'audsync')(syncs_relation, columns, dbt.string_literal(this.identifier), built) -%}
  {%- do out.extend(portability_recorded('audsync_syncs', 'record_evaluation, write_evaluation')) -%}
  {{ return(tojson(out)) }}
{% endmacro %}


{#- The package's state models (audsync_runs, ...) as the tables they are built into: the
    incremental materialization's first build is a create table as of the model's select. -#}
{% macro portability_state_tables() %}
  {%- set out = [] -%}
  {%- for node in graph.nodes.values() | sort(attribute='name') -%}
    {%- if node.resource_type == 'model' and node.package_name == 'audsync' and 'audsync_state' in node.tags -%}
      {%- set relation = api.Relation.create(database=node.database, schema=node.schema, identifier=node.alias or node.name, type='table') -%}
      {%- set select_sql = render(node.raw_code) -%}
      {%- do out.append({'relation': node.name, 'macro': 'empty_table, portable_type', 'sql': get_create_table_as_sql(False, relation, select_sql)}) -%}
    {%- endif -%}
  {%- endfor -%}
  {{ return(tojson(out)) }}
{% endmacro %}
