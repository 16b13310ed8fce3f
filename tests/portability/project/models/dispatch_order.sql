{#- Which of the package's versions adapter.dispatch picks here, for the report. -#}
{%- if execute -%}
{%- set picked = {} -%}
{%- for name in ['recover_rewrite', 'write_evaluation', 'delete_history_before', 'split_bucket', 'row_hash', 'create_sync_indexes'] -%}
  {%- do picked.update({name: adapter.dispatch(name, 'audsync').get_name()}) -%}
{%- endfor -%}
{{ tojson(picked) }}
{%- endif -%}
