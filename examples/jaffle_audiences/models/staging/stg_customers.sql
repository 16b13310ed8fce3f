-- One row per customer, as the shop knows them. Emails are normalised here (trimmed and
-- lowercased) but never de-duplicated: two customers sharing an address is a data problem
-- audsync reports in each sync's `__invalid` relation rather than hiding.
select
    id                                 as customer_id,
    first_name,
    last_name,
    nullif(lower(trim(email)), '')     as email,
    nullif(trim(phone), '')            as phone,
    country,
    created_at
from {{ ref('raw_customers') }}
