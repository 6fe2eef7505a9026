"""The layers: bases and generations, instances, unions, local changes, history (hg), U checks."""
