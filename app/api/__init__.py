"""HTTP routes: parse input, call one service method, map the result."""
