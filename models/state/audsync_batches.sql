{#- The batches a destination answered, by run: the plan rows from first_seq to last_seq
    were delivered, but for those in audsync_row_errors. Written as each batch returns, so a
    run killed midway loses nothing: the next run commits what was delivered. -#}
{{ audsync.empty_table([
    ('run_id', 'string'),
    ('sync_name', 'string'),
    ('batch_no', 'bigint'),
    ('first_seq', 'bigint'),
    ('last_seq', 'bigint'),
    ('rows_rejected', 'bigint'),
    ('rows_unmatched', 'bigint'),
    ('recorded_at', 'timestamp'),
]) }}
