"""The medgen3d application: CLI, demo, report, previews, demo cohorts, bundle export.

Bundles never import this package; an exported bundle carries only ``common``.
"""
