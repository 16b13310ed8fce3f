{#-
  Generic tests for the guardrails (governance.md), so that `dbt build` stops before the
  runner: attach them to a sync model.

      models:
        - name: high_value_to_google_ads
          data_tests:
            - audsync.removals_below: {max_pct: 50, min_rows: 100}
            - audsync.changes_below: {max_pct: 80}
            - audsync.not_emptied

  Each returns one row (the numbers) when the next run would break its limit. The numbers
  are those the runner's guardrails use: removals and changes from S__changes, the members
  the destination holds from S__snapshot.
-#}

{% macro _guard_counts(model) %}
  {%- set n = audsync.audsync_names() -%}
  {%- set changes = api.Relation.create(database=model.database, schema=model.schema, identifier=model.identifier ~ n.suffixes.changes) -%}
  {%- set snapshot = api.Relation.create(database=model.database, schema=model.schema, identifier=model.identifier ~ n.suffixes.snapshot) -%}
select
    (select count(*) from {{ changes }} where {{ n.op }} = 'remove') as removals,
    (select count(*) from {{ changes }}) as changes,
    (select count(*) from {{ snapshot }}) as held,
    (select count(*) from {{ model }}) as audience
{%- endmacro %}

{% test removals_below(model, max_pct=50, min_rows=100, max_rows=none) %}
select * from ({{ audsync._guard_counts(model) }}) as audsync_counts
where (removals > {{ min_rows }} and removals * 100.0 > {{ max_pct }} * held)
{%- if max_rows is not none %}
   or removals > {{ max_rows }}
{%- endif %}
{% endtest %}

{% test changes_below(model, max_pct=100, min_rows=100) %}
select * from ({{ audsync._guard_counts(model) }}) as audsync_counts
where changes > {{ min_rows }} and changes * 100.0 > {{ max_pct }} * held
{% endtest %}

{% test not_emptied(model) %}
select * from ({{ audsync._guard_counts(model) }}) as audsync_counts
where audience = 0 and held > 0
{% endtest %}
