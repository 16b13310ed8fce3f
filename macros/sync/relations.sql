{#-
  The SQL of a sync's relations (contract section 3). Each macro returns a select; the
  materialization decides how it is stored. `cols` are the mapped source columns of `S`.
-#}

{#- S: the valid members of the select, keyed, with the row hash. A row is left out (and shown
    in S__invalid) when its key is null, longer than audsync.max_key_length() characters, or
    not unique: as given, or after the sync's identifier_normalise. Each mapped value is cast
    to text once (`audsync_text_<i>`), and the hash reads that text. -#}
{% macro membership_sql(select_sql, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set texts = {} -%}
  {%- for item in sync.mapping -%}
    {%- do texts.update({item.source_column: 'audsync_text_' ~ loop.index}) -%}
  {%- endfor -%}
with audsync_source as (
{{ select_sql }}
),
audsync_keyed as (
    select
        cast({{ adapter.quote(sync.identifier) }} as {{ dbt.type_string() }}) as {{ n.key }}
        {%- for column in sync.columns %},
        {{ adapter.quote(column) }}
        {%- endfor %}
    from audsync_source
),
{{ audsync.unique_keyed_ctes(sync.get('identifier_normalise', 'none')) }}
audsync_unique as (
    select
        {{ n.key }}
        {%- for column in sync.columns %},
        {{ adapter.quote(column) }}
        {%- endfor %}
        {%- for column, text in texts.items() %},
        cast({{ adapter.quote(column) }} as {{ dbt.type_string() }}) as {{ text }}
        {%- endfor %}
    from audsync_unique_keyed
    where {{ dbt.length(n.key) }} <= {{ audsync.max_key_length() }}
)
select
    {{ n.key }}
    {%- for column in sync.columns %},
    {{ adapter.quote(column) }}
    {%- endfor %},
    {{ audsync.row_hash(sync.mapping, texts=texts) }} as {{ n.hash }}
from audsync_unique
{%- endmacro %}

{#- The CTE `audsync_unique_keyed`: the rows of `audsync_keyed` whose key is not null and is
    no other row's key (under the identifier_normalise `normalise`). Rendered inside
    membership_sql's `with`, each CTE followed by a comma. -#}
{% macro unique_keyed_ctes(normalise) %}
  {{ return(adapter.dispatch('unique_keyed_ctes', 'audsync')(normalise)) }}
{% endmacro %}

{#- A count over a window of the key: one evaluation of the select, and on PostgreSQL a sort
    of the rows is cheaper than a hash of 10M keys that spills past work_mem (measured:
    bench/results/issue16-diffbuild.md). -#}
{% macro default__unique_keyed_ctes(normalise) %}
  {%- set n = audsync.audsync_names() -%}
audsync_counted as (
    select
        audsync_keyed.*,
        count(*) over (
            partition by {{ audsync.normalised_key(n.key, normalise) }}
        ) as audsync_key_count
    from audsync_keyed
    where {{ n.key }} is not null
),
audsync_unique_keyed as (
    select * from audsync_counted where audsync_key_count = 1
),
{%- endmacro %}

{#- DuckDB: the duplicate keys from an aggregate over the keys alone, and the rows without them
    (an anti-join whose other side, the duplicates, is small). DuckDB ran the window as an
    aggregate of every key joined back to every row (bench/results/issue16-diffbuild.md). DuckDB
    evaluates `audsync_keyed` once for both (it materialises a CTE read twice). -#}
{% macro duckdb__unique_keyed_ctes(normalise) %}
  {%- set n = audsync.audsync_names() -%}
audsync_duplicates as (
    select {{ audsync.normalised_key(n.key, normalise) }} as audsync_key_duplicate
    from audsync_keyed
    where {{ n.key }} is not null
    group by {{ audsync.normalised_key(n.key, normalise) }}
    having count(*) > 1
),
audsync_unique_keyed as (
    select * from audsync_keyed
    where {{ n.key }} is not null
      and not exists (
        select 1 from audsync_duplicates
        where audsync_duplicates.audsync_key_duplicate = {{ audsync.normalised_key('audsync_keyed.' ~ n.key, normalise) }}
      )
),
{%- endmacro %}


{#- S__invalid: the rows S leaves out, every column of the select, with the reason (the first
    that applies): null_identifier, identifier_too_long, duplicate_identifier, and under an
    identifier_normalise, duplicate_after_normalising (keys that differ as given but are one
    key once normalised: each such row is listed, and none is in S). -#}
{% macro invalid_sql(select_sql, sync, source_columns) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set normalise = sync.get('identifier_normalise', 'none') -%}
with audsync_source as (
{{ select_sql }}
),
audsync_valued as (
    select
        audsync_source.*,
        cast({{ adapter.quote(sync.identifier) }} as {{ dbt.type_string() }}) as audsync_key_value
    from audsync_source
),
audsync_counted as (
    select
        audsync_valued.*,
        count(*) over (partition by audsync_key_value) as audsync_key_count,
        count(*) over (
            partition by {{ audsync.normalised_key('audsync_key_value', normalise) }}
        ) as audsync_normalised_count
    from audsync_valued
)
select
    audsync_key_value as {{ n.key }},
    case when audsync_key_value is null then 'null_identifier'
         when {{ dbt.length('audsync_key_value') }} > {{ audsync.max_key_length() }}
              then 'identifier_too_long'
         when audsync_key_count > 1 then 'duplicate_identifier'
         else 'duplicate_after_normalising' end as {{ n.reason }}
    {%- for column in source_columns %},
    {{ adapter.quote(column) }}
    {%- endfor %}
from audsync_counted
where audsync_key_value is null
   or {{ dbt.length('audsync_key_value') }} > {{ audsync.max_key_length() }}
   or audsync_key_count > 1
   or audsync_normalised_count > 1
{%- endmacro %}


{#- The members of S and the snapshot rows that differ, joined on the key as `audience` and
    `snapshot`: in one and not the other, or with another hash. -#}
{% macro _differing(membership, snapshot) %}
  {%- set n = audsync.audsync_names() -%}
from {{ membership }} as audience
full outer join {{ snapshot }} as snapshot
    on snapshot.{{ n.key }} = audience.{{ n.key }}
where audience.{{ n.key }} is null
   or snapshot.{{ n.key }} is null
   or snapshot.{{ n.hash }} is null
   or snapshot.{{ n.hash }} <> audience.{{ n.hash }}
{%- endmacro %}

{#- S__candidates: the keys where S and the snapshot may differ. `dbt run` fills it with the
    keys that differ now (one join of S and the snapshot); the runner's commit adds the keys
    it writes and `audsync reset` every key of S. So a key outside it is the same in S and in
    the snapshot, and the diff views join S and the snapshot only over these keys: after a
    sync they are few, and a run, or a run with nothing to send, costs little whatever the
    audience's size. While a run's plan is out the table also holds a row with a null key:
    the runner's mark that S was not rebuilt since its freeze, which the truncate of this
    table in `dbt run` clears. A null key matches nothing in `among_candidates`. -#}
{% macro candidates_sql(membership, snapshot) %}
  {%- set n = audsync.audsync_names() -%}
select coalesce(audience.{{ n.key }}, snapshot.{{ n.key }}) as {{ n.key }}
{{ audsync._differing(membership, snapshot) }}
{%- endmacro %}

{#- The typed, empty shape of S__candidates. -#}
{% macro candidates_shape_sql(membership) %}
  {%- set n = audsync.audsync_names() -%}
select audience.{{ n.key }} from {{ membership }} as audience where 1 = 0
{%- endmacro %}

{#- `relation` (S or its snapshot) restricted to the candidate keys, as a subquery the diff
    macros below read in its place. -#}
{% macro among_candidates(relation, candidates) %}
  {%- set n = audsync.audsync_names() -%}
(select * from {{ relation }} where {{ n.key }} in (select {{ n.key }} from {{ candidates }}))
{%- endmacro %}


{#- The columns every diff relation carries, in this order. -#}
{% macro _diff_columns(sync, alias, destination_id) %}
  {%- set n = audsync.audsync_names() -%}
  {{ alias }}.{{ n.key }}
  {%- for column in sync.columns %},
  {{ alias }}.{{ adapter.quote(column) }}
  {%- endfor %},
  {{ alias }}.{{ n.hash }},
  {{ destination_id }} as {{ n.destination_id }}
{%- endmacro %}

{#- Unknown outcomes. A snapshot row whose `_audsync_hash` is null is *unknown*: the runner
    sent (or may have sent) it, and the answer was lost (a crash, a timeout after retries, a
    stop, a fenced run). The runner writes such a row with the values it planned and keeps its
    key in S__candidates; the views below then send the current truth for that key, whatever
    the audience did since:
      mirror:       key in S: `add` with S's values; key not in S: `remove`;
      add, upsert:  `add`, with S's values when the key is in S, else the unknown row's own
                    (it was in the audience, and these modes keep departed members);
      remove:       `remove` (once a member left, it stays removed).
    An unknown row is never an update: an update assumes the destination holds the member. -#}

{#- S__adds: what is added. In every mode, members of S with no known snapshot row; in `add`
    and `upsert` modes also the unknown snapshot rows whose key left S, with their own values
    and their hash recomputed. In `remove` mode (where adds are only recorded, not sent) a
    member whose snapshot row is unknown is not an add: it is removed first (S__removes). -#}
{% macro adds_sql(membership, snapshot, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- if sync.mode == 'remove' %}
select
  {{ audsync._diff_columns(sync, 'audience', 'cast(null as ' ~ dbt.type_string() ~ ')') }}
from {{ membership }} as audience
where not exists (
    select 1 from {{ snapshot }} as snapshot
    where snapshot.{{ n.key }} = audience.{{ n.key }}
)
  {%- else %}
select
  {{ audsync._diff_columns(sync, 'audience', 'snapshot.' ~ n.destination_id) }}
from {{ membership }} as audience
left join {{ snapshot }} as snapshot
    on snapshot.{{ n.key }} = audience.{{ n.key }}
where snapshot.{{ n.key }} is null
   or snapshot.{{ n.hash }} is null
    {%- if sync.mode in ['add', 'upsert'] %}
union all
{{ audsync._unknown_departed(membership, snapshot, sync) }}
    {%- endif %}
  {%- endif %}
{%- endmacro %}

{#- Unknown snapshot rows whose key is not in S, as adds with their own values; the hash is
    computed from those values, as S computes it, so that the commit records a known row. -#}
{% macro _unknown_departed(membership, snapshot, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
  snapshot.{{ n.key }}
  {%- for column in sync.columns %},
  snapshot.{{ adapter.quote(column) }}
  {%- endfor %},
  {{ audsync.row_hash(sync.mapping, 'snapshot.') }} as {{ n.hash }},
  snapshot.{{ n.destination_id }} as {{ n.destination_id }}
from {{ snapshot }} as snapshot
where snapshot.{{ n.hash }} is null
  and not exists (
    select 1 from {{ membership }} as audience
    where audience.{{ n.key }} = snapshot.{{ n.key }}
)
{%- endmacro %}

{#- S__removes: snapshot rows whose key is not in S, with the values last sent; in `remove`
    mode also the unknown rows whose key is back in S. -#}
{% macro removes_sql(membership, snapshot, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
  {{ audsync._diff_columns(sync, 'snapshot', 'snapshot.' ~ n.destination_id) }}
from {{ snapshot }} as snapshot
where not exists (
    select 1 from {{ membership }} as audience
    where audience.{{ n.key }} = snapshot.{{ n.key }}
)
  {%- if sync.mode == 'remove' %}
   or snapshot.{{ n.hash }} is null
  {%- endif %}
{%- endmacro %}

{#- S__updates: members in both whose known row hash differs, with the current values. -#}
{% macro updates_sql(membership, snapshot, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
  {{ audsync._diff_columns(sync, 'audience', 'snapshot.' ~ n.destination_id) }}
from {{ membership }} as audience
inner join {{ snapshot }} as snapshot
    on snapshot.{{ n.key }} = audience.{{ n.key }}
where snapshot.{{ n.hash }} <> audience.{{ n.hash }}
{%- endmacro %}

{#- S__changes: what the sync's mode sends, one op per row. `add` and `remove` modes send one
    diff view each; `upsert` and `mirror` use one join rather than a union of the diff views,
    so the audience and the snapshot are each read once: the run's plan is frozen from this
    view at every run, whatever the audience's size. A key whose snapshot row is unknown (a
    null hash) is an `add` when it is in S. -#}
{% macro changes_sql(membership, snapshot, diff_relations, sync) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set op_text = dbt.type_string() -%}
  {%- if sync.mode in ['add', 'remove'] %}
select
    cast({{ dbt.string_literal(sync.mode) }} as {{ op_text }}) as {{ n.op }},
    {{ audsync._diff_columns(sync, 'diff', 'diff.' ~ n.destination_id) | indent(4) }}
from {{ diff_relations[sync.mode] }} as diff
  {%- elif sync.mode == 'upsert' %}
select
    cast(case when snapshot.{{ n.key }} is null or snapshot.{{ n.hash }} is null then 'add'
              else 'update' end as {{ op_text }}) as {{ n.op }},
    {{ audsync._diff_columns(sync, 'audience', 'snapshot.' ~ n.destination_id) | indent(4) }}
from {{ membership }} as audience
left join {{ snapshot }} as snapshot
    on snapshot.{{ n.key }} = audience.{{ n.key }}
where snapshot.{{ n.key }} is null
   or snapshot.{{ n.hash }} is null
   or snapshot.{{ n.hash }} <> audience.{{ n.hash }}
union all
select cast('add' as {{ op_text }}) as {{ n.op }}, departed.*
from ({{ audsync._unknown_departed(membership, snapshot, sync) }}) as departed
  {%- else %}
select
    cast(case when audience.{{ n.key }} is null then 'remove'
              when snapshot.{{ n.key }} is null or snapshot.{{ n.hash }} is null then 'add'
              else 'update' end as {{ op_text }}) as {{ n.op }},
    coalesce(audience.{{ n.key }}, snapshot.{{ n.key }}) as {{ n.key }}
    {%- for column in sync.columns %},
    case when audience.{{ n.key }} is null then snapshot.{{ adapter.quote(column) }}
         else audience.{{ adapter.quote(column) }} end as {{ adapter.quote(column) }}
    {%- endfor %},
    case when audience.{{ n.key }} is null then snapshot.{{ n.hash }}
         else audience.{{ n.hash }} end as {{ n.hash }},
    snapshot.{{ n.destination_id }} as {{ n.destination_id }}
{{ audsync._differing(membership, snapshot) }}
  {%- endif %}
{%- endmacro %}


{#- The typed, empty shape of the snapshot: S's columns plus what the runner records. -#}
{% macro snapshot_shape_sql(membership, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
  {{ audsync._diff_columns(sync, 'audience', 'cast(null as ' ~ dbt.type_string() ~ ')') }},
  cast(null as {{ dbt.type_timestamp() }}) as {{ n.synced_at }},
  cast(null as {{ dbt.type_string() }}) as {{ n.run_id }}
from {{ membership }} as audience
where 1 = 0
{%- endmacro %}

{#- The typed, empty shape of the plan: a run's frozen changes, in send order. -#}
{% macro plan_shape_sql(membership, sync) %}
  {%- set n = audsync.audsync_names() -%}
select
  cast(null as {{ dbt.type_string() }}) as {{ n.run_id }},
  cast(null as {{ dbt.type_bigint() }}) as {{ n.seq }},
  cast(null as {{ dbt.type_string() }}) as {{ n.op }},
  cast(null as {{ dbt.type_boolean() }}) as {{ n.send }},
  {{ audsync._diff_columns(sync, 'audience', 'cast(null as ' ~ dbt.type_string() ~ ')') }}
from {{ membership }} as audience
where 1 = 0
{%- endmacro %}
