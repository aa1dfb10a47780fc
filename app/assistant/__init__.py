"""Shopping-assistant answerers: turn a user query into an answer plus matching products."""
