{#- The state of each sync: status, last run, and the lock that keeps runs one at a time.
    `lock_generation` counts the lock's acquisitions: a run holds the lock only while the
    generation it took is still the row's (fencing). Unique per sync_name on PostgreSQL. -#}
{{ config(post_hook="{{ audsync.unique_sync_name(this) }}") }}
{{ audsync.empty_table([
    ('sync_name', 'string'),
    ('status', 'string'),
    ('status_error', 'string'),
    ('last_synced_at', 'timestamp'),
    ('last_run_id', 'string'),
    ('lock_run_id', 'string'),
    ('lock_owner', 'string'),
    ('lock_acquired_at', 'timestamp'),
    ('lock_heartbeat_at', 'timestamp'),
    ('destination_state', 'string'),
    ('updated_at', 'timestamp'),
    ('lock_generation', 'bigint'),
]) }}
