{#-
  `audsync_syncs` holds one row per sync. On PostgreSQL a unique index makes that hold when two
  runs (or a run and `audsync pause`) insert a sync's first row at once: the runner inserts
  with `on conflict do nothing`. Called as a post-hook of the model. DuckDB admits one writing
  process at a time, so there the runner's insert-if-missing is enough.
-#}
{% macro unique_sync_name(relation) %}
  {{ return(adapter.dispatch('unique_sync_name', 'audsync')(relation)) }}
{% endmacro %}

{% macro default__unique_sync_name(relation) %}
  {{ return('select 1') }}
{% endmacro %}

{% macro postgres__unique_sync_name(relation) %}
  {{ return('create unique index if not exists ' ~ adapter.quote(relation.identifier ~ '_sync_name_key') ~ ' on ' ~ relation ~ ' (sync_name)') }}
{% endmacro %}
