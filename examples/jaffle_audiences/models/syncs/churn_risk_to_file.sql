-- Churn-risk customers to a file, mirrored: customers who order again are removed.
-- Governance: the treatment group of the churn_q4 split only (its holdout is never sent),
-- and never anyone on the do_not_contact list (matched ignoring case and spaces).
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
    split_group   = 'churn_q4.treatment',
    exclude       = ['do_not_contact'],
) }}
-- The exclusion list is built before this sync reads it:
-- depends_on: {{ ref('do_not_contact') }}
select email, days_since_last_order from {{ ref('churn_risk') }}
