"""Reserved for the live-migration engine, which lives in `failover.migration` today
(planner, codecs, source and target); issue 12 moves it here. Nothing imports this package.
"""
