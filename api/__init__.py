"""The network API: REST, websocket feeds, auth and the web page. It translates and delegates."""
