"""Feature set declarations: one module per version, each defining ``FEATURE_SET``.

Every module here is found by ``marketfs.features.registry``; adding ``fs_v3.py`` adds the set to
the table's columns, the suites, the catalog and the Dagster assets (see docs/authoring.md, "Adding a
feature").
"""
