{#- An exclusion list the syncs name (a model of the project, as exclude= expects). -#}
select email from {{ source('crm', 'contacts') }} where 1 = 0
