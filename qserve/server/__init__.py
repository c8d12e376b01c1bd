"""The trio edge: HTTP/1.1 and WebSocket on one port, the application that maps requests onto
queues, the watch service, start-up, and the fsync backends.
"""
