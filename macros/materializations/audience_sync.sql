{#-
  The `audience_sync` materialization (contract sections 2 and 3).

  For a sync model S, one `dbt run` builds, in the model's database and schema:

    S             table  the valid members: _audsync_key, mapped columns, _audsync_hash
    S__snapshot   table  what the destination holds; created when missing, never replaced
    S__plan       table  the runner's frozen plans, by run id; created when missing
    S__candidates table  keys where S and the snapshot may differ; refilled by every run
    S__adds       view   members of S not in the snapshot
    S__removes    view   snapshot rows not in S
    S__updates    view   members in both whose hash differs
    S__changes    view   what the sync's mode sends, with _audsync_op
    S__invalid    view   rows left out for a null or duplicate identifier, with the reason

  It reads top to bottom in phases: relations, config, build S, keep state, views, finish.
-#}

{% materialization audience_sync, default %}
  {%- set n = audsync.audsync_names() -%}

  {#- 1. Relations ------------------------------------------------------------------- -#}
  {%- set target_relation = this.incorporate(type='table') -%}
  {%- set existing_relation = load_cached_relation(this) -%}
  {%- set intermediate_relation = make_intermediate_relation(target_relation) -%}
  {%- set backup_relation = make_backup_relation(target_relation, 'table' if existing_relation is none else existing_relation.type) -%}
  {%- set sibling = {} -%}
  {%- for part, suffix in n.suffixes.items() -%}
    {%- do sibling.update({part: api.Relation.create(
          database=target_relation.database,
          schema=target_relation.schema,
          identifier=target_relation.identifier ~ suffix,
          type=('table' if part in ['snapshot', 'plan', 'candidates'] else 'view'))}) -%}
  {%- endfor -%}

  {#- 2. Config: validated against the columns the select really returns -------------- -#}
  {%- set source_columns = get_columns_in_query(sql) -%}
  {%- set sync = audsync.sync_config(source_columns) -%}
  {%- set grant_config = config.get('grants') -%}

  {{ drop_relation_if_exists(load_cached_relation(intermediate_relation)) }}
  {{ drop_relation_if_exists(load_cached_relation(backup_relation)) }}

  {{ run_hooks(pre_hooks, inside_transaction=False) }}
  {{ run_hooks(pre_hooks, inside_transaction=True) }}

  {#- 3. Build S beside the old one, then swap ---------------------------------------- -#}
  {% call statement('main') -%}
    {{ get_create_table_as_sql(False, intermediate_relation, audsync.governed_membership_sql(audsync.membership_sql(sql, sync), sync)) }}  {#- governance: exclusions and split -#}
  {%- endcall %}
  {% if existing_relation is not none %}
    {% set existing_relation = load_cached_relation(existing_relation) %}
    {% if existing_relation is not none %}
      {{ adapter.rename_relation(existing_relation, backup_relation) }}
    {% endif %}
  {% endif %}
  {{ adapter.rename_relation(intermediate_relation, target_relation) }}

  {#- 4. State kept across runs: created when missing, widened, never replaced -------- -#}
  {% do audsync.ensure_table(sibling.snapshot, audsync.snapshot_shape_sql(target_relation, sync)) %}
  {% do audsync.ensure_table(sibling.plan, audsync.plan_shape_sql(target_relation, sync)) %}
  {% do audsync.ensure_table(sibling.candidates, audsync.candidates_shape_sql(target_relation)) %}
  {#- S is new: without statistics PostgreSQL plans the join below blind. -#}
  {% do audsync.refresh_statistics(target_relation) %}
  {% do truncate_relation(sibling.candidates) %}
  {% call statement('audsync_candidates') -%}
    insert into {{ sibling.candidates }} ({{ n.key }})
    {{ audsync.candidates_sql(target_relation, sibling.snapshot) }}
  {%- endcall %}
  {% do audsync.refresh_statistics(sibling.candidates) %}

  {#- 5. The diff, as views over S and the snapshot, among the candidate keys ---------- -#}
  {%- set audience = audsync.among_candidates(target_relation, sibling.candidates) -%}
  {%- set snapshot = audsync.among_candidates(sibling.snapshot, sibling.candidates) -%}
  {% do audsync.replace_view(sibling.adds, audsync.adds_sql(audience, snapshot, sync)) %}
  {% do audsync.replace_view(sibling.removes, audsync.removes_sql(audience, snapshot, sync)) %}
  {% do audsync.replace_view(sibling.updates, audsync.updates_sql(audience, snapshot, sync)) %}
  {% do audsync.replace_view(sibling.changes, audsync.with_excluded_removals(audsync.changes_sql(audience, snapshot, {'add': sibling.adds, 'remove': sibling.removes}, sync), snapshot, sync)) %}  {#- governance: excluded removals -#}
  {% do audsync.replace_view(sibling.invalid, audsync.invalid_sql(sql, sync, source_columns)) %}
  {%- set governance_relations = audsync.governance_relations(target_relation, sql, sync) -%}  {#- governance: S__excluded, S__split, S__history -#}

  {#- 6. Finish: hooks, grants, docs, commit, then drop the old S --------------------- -#}
  {{ run_hooks(post_hooks, inside_transaction=True) }}
  {% set should_revoke = should_revoke(existing_relation, full_refresh_mode=True) %}
  {% do apply_grants(target_relation, grant_config, should_revoke=should_revoke) %}
  {% do persist_docs(target_relation, model) %}
  {#- serve branch (issue 12): freshness, S's build time in audsync_syncs (sync/evaluation.sql) -#}
  {% do audsync.record_evaluation(this.identifier) %}
  {{ adapter.commit() }}
  {{ drop_relation_if_exists(backup_relation) }}
  {{ run_hooks(post_hooks, inside_transaction=False) }}

  {{ return({'relations': [target_relation, sibling.snapshot, sibling.plan, sibling.candidates, sibling.adds, sibling.removes, sibling.updates, sibling.changes, sibling.invalid] + governance_relations}) }}
{% endmaterialization %}
