-- Customers whose lifetime value has reached `high_value_min_ltv`.
select
    email,
    first_name,
    lifetime_value,
    order_count
from {{ ref('customer_stats') }}
where lifetime_value >= {{ var('high_value_min_ltv') }}
