"""`make bench`: the ceilings, cdc-relay and a polling relay, side by side."""
