-- Recent buyers to files in their own folder, add only: everyone who ever bought recently
-- stays listed.
{{ config(
    materialized  = 'audience_sync',
    destination   = 'demo_file',
    sync_mode     = 'add',
    identifier    = 'email',
    field_mapping = [
        {'source_column': 'email',           'destination_field': 'email'},
        {'source_column': 'country',         'destination_field': 'country'},
        {'source_column': 'last_order_date', 'destination_field': 'lastOrderDate'},
    ],
    schedule      = 'daily',
    config        = {'path': 'output/recent_buyers'},
) }}
select email, country, last_order_date from {{ ref('recent_buyers') }}
