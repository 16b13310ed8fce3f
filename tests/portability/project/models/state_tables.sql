{#- The package's state models as the tables they are built into. -#}
{% if execute %}{{ portability_state_tables() }}{% endif %}
