"""audsync: a warehouse-native audience sync.

The dbt package at the repository root diffs each audience inside the warehouse; this
package is the runner that freezes the diff, streams it to the destination, and commits what
the destination accepted into the snapshot.
"""

__version__ = "0.1.0"
