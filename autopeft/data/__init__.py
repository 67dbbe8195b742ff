"""Layer 1, data: the built-in tasks (``tasks``), user data turned into a task (``userdata``), reading
user files (``userfiles``), splits (``splits``) and the scores' intervals (``uncertainty``)."""
