{#-
  Names shared by the dbt package and the runner, spelled once here for dbt and once in
  python/audsync/names.py for Python; tests/integration/test_names.py holds the two together.
-#}

{% macro audsync_names() %}
  {{ return({
      'key': '_audsync_key',
      'hash': '_audsync_hash',
      'op': '_audsync_op',
      'synced_at': '_audsync_synced_at',
      'run_id': '_audsync_run_id',
      'destination_id': '_audsync_destination_id',
      'seq': '_audsync_seq',
      'send': '_audsync_send',
      'reason': '_audsync_reason',
      'suffixes': {
          'snapshot': '__snapshot',
          'plan': '__plan',
          'candidates': '__candidates',
          'adds': '__adds',
          'removes': '__removes',
          'updates': '__updates',
          'changes': '__changes',
          'invalid': '__invalid',
      },
      'rewrite_suffixes': {
          'next': '__audsync_next',
          'old': '__audsync_old',
      },
      'governance_suffixes': {
          'excluded': '__excluded',
          'split': '__split',
          'history': '__history',
      },
      'ops': ['add', 'remove', 'update'],
      'modes': ['mirror', 'add', 'upsert', 'remove'],
      'mode_aliases': {'additive': 'add', 'subtractive': 'remove'},
      'mode_sends': {
          'mirror': ['add', 'remove', 'update'],
          'add': ['add'],
          'upsert': ['add', 'update'],
          'remove': ['remove'],
      },
  }) }}
{% endmacro %}
