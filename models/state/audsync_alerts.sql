{#- Every alert audsync sent or tried to send (governance.md), by run. Filled by the runner;
    `message` is the alert's text, which never holds a secret or member data. -#}
{{ audsync.empty_table([
    ('run_id', 'string'),
    ('sync_name', 'string'),
    ('rule', 'string'),
    ('channel', 'string'),
    ('status', 'string'),
    ('error_message', 'string'),
    ('message', 'string'),
    ('sent_at', 'timestamp'),
]) }}
