-- High-value customers to the CRM webhook. `upsert`: new members are added and changed
-- lifetime values are updated; customers are never removed from the CRM.
{{ config(
    materialized  = 'audience_sync',
    destination   = 'demo_webhook',
    sync_mode     = 'upsert',
    identifier    = 'email',
    field_mapping = [
        {'source_column': 'email',          'destination_field': 'email'},
        {'source_column': 'first_name',     'destination_field': 'firstName'},
        {'source_column': 'lifetime_value', 'destination_field': 'Customer Value'},
    ],
    schedule      = 'hourly',
    exclude       = ['do_not_contact'],
    max_removals_pct = 20,
) }}
-- depends_on: {{ ref('do_not_contact') }}
select email, first_name, lifetime_value from {{ ref('high_value_customers') }}
