{#-
  The row hash: one string per member that changes exactly when a mapped value, or the
  mapping itself, changes.

  * null-safe: a null encodes as `N`, a value as `V<length>:<value>`, so null, '' and 'null'
    differ;
  * delimiter-safe: the length prefix makes the encoding a prefix code, so ('a|', 'b') and
    ('a', '|b') differ;
  * stable: md5 over text, which every warehouse computes the same way from run to run;
  * it starts with the mapping (destination field names in order), so renaming or adding a
    destination field re-sends every member with the new shape.
-#}

{% macro row_hash(mapping, prefix='') %}
  {{ return(adapter.dispatch('row_hash', 'audsync')(mapping, prefix)) }}
{% endmacro %}

{% macro default__row_hash(mapping, prefix) %}
  {%- set signature = [] -%}
  {%- for item in mapping -%}
    {%- do signature.append(item.destination_field ~ '=' ~ item.source_column) -%}
  {%- endfor -%}
  {%- set parts = [dbt.string_literal(signature | join(';') ~ '|')] -%}
  {%- for item in mapping -%}
    {%- do parts.append(audsync.encode_value(prefix ~ adapter.quote(item.source_column))) -%}
  {%- endfor -%}
  {{- dbt.hash(dbt.concat(parts)) -}}
{% endmacro %}

{#- `N` for null, else `V<length>:<text>`: a prefix code over the value's text. -#}
{% macro encode_value(expression) %}
  {%- set text = "cast(" ~ expression ~ " as " ~ dbt.type_string() ~ ")" -%}
  case when {{ expression }} is null then 'N'
       else {{ dbt.concat(["'V'", "cast(" ~ dbt.length(text) ~ " as " ~ dbt.type_string() ~ ")", "':'", text]) }}
  end
{%- endmacro %}
