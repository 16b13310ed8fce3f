{#- See dbt_project.yml: stands in for spark__recover_rewrite, which lists relations. -#}
{% macro databricks__recover_rewrite(relation) %}
{% endmacro %}
