-- Customers who ordered in the last `recent_buyer_days` days.
select
    email,
    first_name,
    country,
    last_order_date
from {{ ref('customer_stats') }}
where days_since_last_order <= {{ var('recent_buyer_days') }}
