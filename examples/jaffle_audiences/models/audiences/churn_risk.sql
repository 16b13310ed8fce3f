-- Repeat customers who have gone quiet: no order for `churn_risk_min_days` to
-- `churn_risk_max_days` days. A new order takes them out again.
select
    email,
    phone,
    last_order_date,
    days_since_last_order
from {{ ref('customer_stats') }}
where order_count >= 2
  and days_since_last_order between {{ var('churn_risk_min_days') }}
                                and {{ var('churn_risk_max_days') }}
