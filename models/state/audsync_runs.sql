{#- One row per run of a sync (contract section 6). Filled by the runner.
    match_rate (connectors branch): (accepted - unmatched) / sent, null when nothing was sent.
    evaluated_at: when S was last built, as the run saw it (freshness, api.md). -#}
{{ audsync.empty_table([
    ('run_id', 'string'),
    ('sync_name', 'string'),
    ('trigger', 'string'),
    ('status', 'string'),
    ('started_at', 'timestamp'),
    ('finished_at', 'timestamp'),
    ('duration_ms', 'bigint'),
    ('planned_adds', 'bigint'),
    ('planned_removes', 'bigint'),
    ('planned_updates', 'bigint'),
    ('rows_added', 'bigint'),
    ('rows_removed', 'bigint'),
    ('rows_updated', 'bigint'),
    ('rows_failed', 'bigint'),
    ('error_message', 'string'),
    ('destination', 'string'),
    ('sync_mode', 'string'),
    ('rows_recorded', 'bigint'),
    ('rows_unmatched', 'bigint'),
    ('full_resync', 'boolean'),
    ('rows_unknown', 'bigint'),
    ('match_rate', 'float'),
    ('evaluated_at', 'timestamp'),
]) }}
