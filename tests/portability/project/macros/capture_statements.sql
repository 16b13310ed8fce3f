{#- The check's own `statement` (the root project's macro comes before dbt's, also for the
    package's `call statement`): the SQL a macro would run is recorded in the graph's dict,
    which every macro of the compile shares, and nothing runs. portability_statements()
    takes what was recorded. -#}
{% macro statement(name=None, fetch_result=False, auto_begin=True, language='sql') -%}
  {%- if execute -%}
    {%- do graph.setdefault('audsync_portability_statements', []).append({'name': name, 'sql': caller()}) -%}
  {%- endif -%}
{%- endmacro %}

{#- What statement() recorded since the last call, as {relation, macro, sql} items. -#}
{% macro portability_recorded(relation, macro) %}
  {%- set out = [] -%}
  {%- for item in graph.pop('audsync_portability_statements', []) -%}
    {%- do out.append({'relation': relation, 'macro': macro ~ ' (statement ' ~ item.name ~ ')', 'sql': item.sql}) -%}
  {%- endfor -%}
  {{ return(out) }}
{% endmacro %}
