select
    id                                 as order_id,
    customer_id,
    cast(order_date as date)           as order_date,
    cast(amount as decimal(12, 2))     as amount
from {{ ref('raw_orders') }}
