{#- Ids a destination gave accepted members (HubSpot record ids, Klaviyo profile ids, ...),
    by run, until the commit copies them into the snapshot's _audsync_destination_id. -#}
{{ audsync.empty_table([
    ('run_id', 'string'),
    ('sync_name', 'string'),
    ('member_key', 'string'),
    ('destination_id', 'string'),
]) }}
