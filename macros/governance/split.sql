{#-
  Split groups (governance.md). A member's bucket depends only on (salt, key):

      bucket = int(first 8 hex digits of md5(salt || ':' || key), 16) mod 10000

  in basis points; group i of a split takes the buckets [sum of the percents before it,
  that + its percent) * 100. python/audsync/governance/splits.py is the Python reference
  the tests hold every warehouse to.
-#}

{#- The bucket (0..9999) of the text expression `key_expr` under `salt`. -#}
{% macro split_bucket(key_expr, salt) %}
  {{ return(adapter.dispatch('split_bucket', 'audsync')(key_expr, salt)) }}
{% endmacro %}

{#- DuckDB (and engines that read a 0x-prefixed hex text as an integer). -#}
{% macro default__split_bucket(key_expr, salt) -%}
(cast(('0x' || substr(md5({{ dbt.concat([dbt.string_literal(salt ~ ':'), key_expr]) }}), 1, 8)) as bigint) % 10000)
{%- endmacro %}

{#- PostgreSQL reads hex through a bit string: 'x' || hex -> bit(32) -> bigint (unsigned,
    since the 32 bits land in a 64-bit integer). -#}
{% macro postgres__split_bucket(key_expr, salt) -%}
(('x' || substr(md5({{ dbt.concat([dbt.string_literal(salt ~ ':'), key_expr]) }}), 1, 8))::bit(32)::bigint % 10000)
{%- endmacro %}

{#- The first 8 hex digits of md5(salt || ':' || key), as text: each warehouse's version of
    split_bucket that cannot read 0x-prefixed text says only how to read them as a number. -#}
{% macro _split_hex_prefix(key_expr, salt) -%}
substr({{ dbt.hash(dbt.concat([dbt.string_literal(salt ~ ':'), key_expr])) }}, 1, 8)
{%- endmacro %}

{#- The key of a member as S spells it: the identifier cast to text. -#}
{% macro _split_key(key_expr) -%}
cast({{ key_expr }} as {{ dbt.type_string() }})
{%- endmacro %}

{#- A case expression over the groups of `split` (from split_definition) for `bucket_sql`. -#}
{% macro _split_group_case(bucket_sql, split) -%}
case
  {%- for group in split.groups %}
  when {{ bucket_sql }} >= {{ group.range[0] }} and {{ bucket_sql }} < {{ group.range[1] }} then {{ dbt.string_literal(group.name) }}
  {%- endfor %}
end
{%- endmacro %}

{#- The group of `split_name` (in vars.audsync_splits) of the key `key_expr`, in any model:
    `select email, {{ audsync.split_group('email', 'hv_q4') }} as hv_q4_group from ...` -#}
{% macro split_group(key_expr, split_name) %}
  {%- if not execute -%}{{ return("cast(null as " ~ dbt.type_string() ~ ")") }}{%- endif -%}
  {%- set split = audsync.split_definition(split_name, "audsync: split_group(" ~ key_expr ~ ", '" ~ split_name ~ "') in " ~ model.name) -%}
  {{ return(audsync._split_group_case(audsync.split_bucket(audsync._split_key(key_expr), split.salt), split)) }}
{% endmacro %}

{#- Keep, of `membership_sql` (S's select), the members of the sync's group. -#}
{% macro split_filter_sql(membership_sql, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set split = sync.governance.split -%}
  {%- set bucket = audsync.split_bucket('audsync_split_member.' ~ n.key, split.salt) -%}
select audsync_split_member.*
from ({{ membership_sql }}) as audsync_split_member
where {{ bucket }} >= {{ split.range[0] }} and {{ bucket }} < {{ split.range[1] }}
{%- endmacro %}

{#- S__split: every member of the sync's audience (exclusions applied), with its split,
    group and bucket, whatever group the sync sends. -#}
{% macro split_view_sql(membership_sql, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set split = sync.governance.split -%}
select
    {{ n.key }},
    cast({{ dbt.string_literal(split.name) }} as {{ dbt.type_string() }}) as split,
    cast({{ audsync._split_group_case('audsync_bucket', split) }} as {{ dbt.type_string() }}) as split_group,
    audsync_bucket as bucket
from (
    select audsync_split_member.{{ n.key }},
           {{ audsync.split_bucket('audsync_split_member.' ~ n.key, split.salt) }} as audsync_bucket
    from ({{ membership_sql }}) as audsync_split_member
) as audsync_split_buckets
{%- endmacro %}
