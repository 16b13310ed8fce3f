-- Churn-risk customers to a file, mirrored: customers who order again are removed.
{{ config(
    materialized  = 'audience_sync',
    destination   = 'demo_file',
    sync_mode     = 'mirror',
    identifier    = 'email',
    field_mapping = [
        {'source_column': 'email',                 'destination_field': 'email'},
        {'source_column': 'days_since_last_order', 'destination_field': 'days_inactive'},
    ],
    schedule      = '0 6 * * *',
) }}
select email, days_since_last_order from {{ ref('churn_risk') }}
