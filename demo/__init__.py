"""`make demo`: vmop stopping a cooperative and a stubborn guest on the real test bed, told as a timeline."""
