-- Each customer who existed on `as_of_date`, with their order history up to that day.
{% set as_of = "cast('" ~ var('as_of_date') ~ "' as date)" %}

with orders as (

    select * from {{ ref('stg_orders') }}
    where order_date <= {{ as_of }}

),

per_customer as (

    select
        customer_id,
        count(*)        as order_count,
        sum(amount)     as lifetime_value,
        min(order_date) as first_order_date,
        max(order_date) as last_order_date
    from orders
    group by customer_id

)

select
    c.customer_id,
    c.email,
    c.first_name,
    c.last_name,
    c.phone,
    c.country,
    coalesce(p.order_count, 0)                              as order_count,
    cast(coalesce(p.lifetime_value, 0) as decimal(12, 2))   as lifetime_value,
    p.first_order_date,
    p.last_order_date,
    {{ dbt.datediff('p.last_order_date', as_of, 'day') }}    as days_since_last_order
from {{ ref('stg_customers') }} as c
left join per_customer as p on p.customer_id = c.customer_id
where cast(c.created_at as date) <= {{ as_of }}
