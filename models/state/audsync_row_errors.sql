{#- Every row a destination rejected, by run (contract section 6). Filled by the runner. -#}
{{ audsync.empty_table([
    ('run_id', 'string'),
    ('sync_name', 'string'),
    ('member_key', 'string'),
    ('op', 'string'),
    ('error_code', 'string'),
    ('error_message', 'string'),
    ('retryable', 'boolean'),
    ('recorded_at', 'timestamp'),
]) }}
